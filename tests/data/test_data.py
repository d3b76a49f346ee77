"""Tests of lorae.data on tiny fixtures written in the real on-disk formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lorae.backbones import backbone_preprocessing
from lorae.data import (
    ClassificationDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    TextClassificationDataModule,
    seeded_split,
    split_indices,
)
from lorae.data.preprocessing import ImagePreprocessing, TextPreprocessing
from lorae.errors import ConfigError, DataNotFoundError
from tests.fixtures.builders import (
    GLUE_QUOTE_SENTENCES,
    TINY_VOCAB,
    write_glue_tsv,
    write_image_folder,
    write_tiny_tokenizer,
)

# ---------------------------------------------------------------------------------- helpers


def loaders(dm: ClassificationDataModule) -> dict[str, DataLoader[Any]]:
    return {
        "train": dm.train_dataloader(),
        "val": dm.val_dataloader(),
        "test": dm.test_dataloader(),
        "predict": dm.predict_dataloader(),
    }


def split_sizes(dm: ClassificationDataModule) -> tuple[int, int, int]:
    dm.setup("fit")
    return len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)  # type: ignore[arg-type]


def all_inputs(loader: DataLoader[Any]) -> Tensor:
    return torch.cat([inputs for inputs, _ in loader])


def check_target(target: Tensor, batch_size: int, num_classes: int) -> None:
    assert target.dtype == torch.long
    assert target.shape == (batch_size,)
    assert int(target.min()) >= 0 and int(target.max()) < num_classes


# ------------------------------------------------------------------------------ split helper


def test_split_indices_partition_and_determinism() -> None:
    rest, test, val = split_indices(50, (0.2, 0.1), seed=3)
    assert (len(rest), len(test), len(val)) == (35, 10, 5)
    assert sorted(rest + test + val) == list(range(50))
    assert split_indices(50, (0.2, 0.1), seed=3) == [rest, test, val]
    assert split_indices(50, (0.2, 0.1), seed=4) != [rest, test, val]
    # The first part depends only on its own fraction: the test split is stable when the
    # validation fraction changes.
    assert split_indices(50, (0.2, 0.3), seed=3)[1] == test
    # A positive fraction always yields at least one sample.
    assert len(split_indices(5, (0.01,), seed=0)[1]) == 1


def test_split_indices_rejects_too_large_fractions() -> None:
    with pytest.raises(ConfigError, match="none left for training"):
        split_indices(4, (0.5, 0.5), seed=0)
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        split_indices(4, (1.5,), seed=0)


def test_seeded_split_returns_subsets() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(20))
    rest, part = seeded_split(data, (0.25,), seed=0)
    assert len(rest) == 15 and len(part) == 5
    values = {int(rest[i][0]) for i in range(15)} | {int(part[i][0]) for i in range(5)}
    assert values == set(range(20))


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("val_fraction", 1.5, r"val_fraction must be a number in \[0, 1\)"),
        ("val_fraction", -0.1, r"val_fraction must be a number in \[0, 1\)"),
        ("batch_size", 0, "batch_size must be an integer >= 1"),
        ("eval_batch_size", 0, "eval_batch_size must be an integer >= 1"),
        ("num_workers", -1, "num_workers must be an integer >= 0"),
    ],
)
def test_invalid_base_arguments(argument: str, value: float, message: str) -> None:
    options: dict[str, Any] = {argument: value}
    with pytest.raises(ConfigError, match=message):
        DigitsDataModule(**options)


def test_eval_batch_size_defaults_to_batch_size() -> None:
    assert DigitsDataModule(batch_size=7).eval_batch_size == 7
    assert DigitsDataModule(batch_size=7, eval_batch_size=9).eval_batch_size == 9


# ----------------------------------------------------------------------------------- digits


def test_digits_splits_and_batches() -> None:
    dm = DigitsDataModule(batch_size=64, eval_batch_size=100, seed=0)
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    sizes = split_sizes(dm)
    assert sum(sizes) == 1797
    assert sizes == (1257, 270, 270)
    for name, loader in loaders(dm).items():
        inputs, target = next(iter(loader))
        batch = 64 if name == "train" else 100
        assert inputs.dtype == torch.float32 and inputs.shape == (batch, 1, 8, 8)
        check_target(target, batch, 10)
    everything = torch.cat([all_inputs(loader) for loader in (dm.train_dataloader(),)])
    assert float(everything.min()) == -1.0 and float(everything.max()) == 1.0


def test_digits_split_is_seed_deterministic() -> None:
    def test_inputs(seed: int) -> Tensor:
        return all_inputs(DigitsDataModule(seed=seed, eval_batch_size=500).test_dataloader())

    assert torch.equal(test_inputs(0), test_inputs(0))
    assert not torch.equal(test_inputs(0), test_inputs(1))


def test_train_shuffle_is_seeded() -> None:
    def first_targets(seed: int) -> Tensor:
        return next(iter(DigitsDataModule(seed=seed, batch_size=64).train_dataloader()))[1]

    assert torch.equal(first_targets(0), first_targets(0))
    assert not torch.equal(first_targets(0), first_targets(1))


# ------------------------------------------------------------------------------ image folder


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


def test_image_folder_classes_known_after_init(image_root: Path) -> None:
    dm = ImageFolderDataModule(str(image_root))
    assert dm.num_classes == 3
    assert dm.class_names == ["cat", "dog", "frog"]


def test_image_folder_carves_val_and_uses_test_folder(image_root: Path) -> None:
    dm = ImageFolderDataModule(str(image_root), image_size=12, batch_size=4, eval_batch_size=5)
    assert split_sizes(dm) == (16, 2, 18)
    for name, loader in loaders(dm).items():
        inputs, target = next(iter(loader))
        batch = 4 if name == "train" else 2 if name == "val" else 5
        assert inputs.dtype == torch.float32 and inputs.shape == (batch, 3, 12, 12)
        check_target(target, batch, 3)


def test_image_folder_carves_test_when_missing(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", per_class=10, splits=("train",))
    dm = ImageFolderDataModule(str(root), image_size=8, test_fraction=0.2, val_fraction=0.1)
    assert split_sizes(dm) == (21, 3, 6)

    def carved(seed: int) -> tuple[Tensor, Tensor]:
        other = ImageFolderDataModule(str(root), image_size=8, test_fraction=0.2, seed=seed)
        return all_inputs(other.val_dataloader()), all_inputs(other.test_dataloader())

    val0, test0 = carved(0)
    assert torch.equal(val0, carved(0)[0]) and torch.equal(test0, carved(0)[1])
    val1, test1 = carved(1)
    assert not torch.equal(val0, val1) and not torch.equal(test0, test1)


def test_image_folder_uses_val_folder(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", per_class=2, splits=("train", "val", "test"))
    dm = ImageFolderDataModule(str(root), image_size=8, augment=True, batch_size=6)
    assert split_sizes(dm) == (6, 6, 6)
    inputs, target = next(iter(dm.train_dataloader()))
    assert inputs.shape == (6, 3, 8, 8)
    check_target(target, 6, 3)


def test_image_folder_normalization(image_root: Path) -> None:
    dm = ImageFolderDataModule(str(image_root), image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    inputs = all_inputs(dm.test_dataloader())
    assert -1.0 <= float(inputs.min()) < -0.9 and 0.9 < float(inputs.max()) <= 1.0


def test_image_folder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"(?s)does not exist.*<root>/train/<class_name>"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))


def test_image_folder_missing_train(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", splits=("test",))
    with pytest.raises(DataNotFoundError, match=r"(?s)Training folder '.*train' does not exist"):
        ImageFolderDataModule(str(root))


def test_image_folder_empty_train(tmp_path: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match=r"(?s)No class folders found in .*train"):
        ImageFolderDataModule(str(tmp_path / "images"))
    (tmp_path / "images" / "train" / "cat").mkdir()
    (tmp_path / "images" / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataNotFoundError, match=r"No images found in class folder\(s\) \['cat'\]"):
        ImageFolderDataModule(str(tmp_path / "images"))


def test_image_folder_mismatched_classes(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", per_class=1, splits=("train",))
    write_image_folder(root, classes=("cat", "dog", "bird"), per_class=1, splits=("test",))
    with pytest.raises(
        ConfigError, match=r"differ.*missing in test/: \['frog'\], not in train/: \['bird'\]"
    ):
        ImageFolderDataModule(str(root))


def test_image_folder_invalid_val_fraction(image_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"val_fraction must be a number in \[0, 1\)"):
        ImageFolderDataModule(str(image_root), val_fraction=1.0)


# -------------------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def glue_root(tmp_path: Path) -> Path:
    return write_glue_tsv(tmp_path / "SST-2")


def text_module(root: Path, tokenizer_dir: Path, **options: Any) -> TextClassificationDataModule:
    return TextClassificationDataModule(str(root), str(tokenizer_dir), **options)


def test_text_num_classes_after_init(glue_root: Path, tokenizer_dir: Path) -> None:
    dm = text_module(glue_root, tokenizer_dir)
    assert dm.num_classes == 2 and dm.class_names == ["0", "1"]
    assert text_module(glue_root, tokenizer_dir, num_classes=3).num_classes == 3


def test_text_splits(glue_root: Path, tokenizer_dir: Path) -> None:
    assert split_sizes(text_module(glue_root, tokenizer_dir)) == (22, 2, 12)
    assert split_sizes(text_module(glue_root, tokenizer_dir, val_fraction=0.25)) == (18, 6, 12)
    with_val = text_module(glue_root, tokenizer_dir, val_file="dev.tsv")
    assert split_sizes(with_val) == (24, 12, 12)

    def val_ids(seed: int) -> list[list[int]]:
        dm = text_module(glue_root, tokenizer_dir, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return [dm.val_dataset[i][0]["input_ids"] for i in range(6)]

    assert val_ids(0) == val_ids(0)
    assert val_ids(0) != val_ids(1)


def test_text_batches_are_padded_per_batch(glue_root: Path, tokenizer_dir: Path) -> None:
    dm = text_module(glue_root, tokenizer_dir, batch_size=4, eval_batch_size=3)
    lengths = set()
    for name, loader in loaders(dm).items():
        for inputs, target in loader:
            assert isinstance(inputs, dict)
            assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            batch = ids.shape[0]
            assert batch <= (4 if name == "train" else 3)
            for tensor in inputs.values():
                assert tensor.dtype == torch.long and tensor.shape == ids.shape
            # Padded to the batch's own longest sequence, mask marks the real tokens.
            assert ids.shape[1] == int(mask.sum(dim=1).max())
            assert torch.equal(mask, (ids != 0).long())
            lengths.add(ids.shape[1])
            check_target(target, batch, 2)
    assert len(lengths) > 1


def test_text_truncates_to_max_length(glue_root: Path, tokenizer_dir: Path) -> None:
    dm = text_module(glue_root, tokenizer_dir, max_length=6, batch_size=24)
    inputs, _ = next(iter(dm.train_dataloader()))
    assert inputs["input_ids"].shape[1] == 6


def test_text_quotes_parse_like_glue(glue_root: Path, tokenizer_dir: Path) -> None:
    # The first dev sentence contains double quotes; the first training sentence opens a quote
    # it never closes. Both must stay one row each, quotes included.
    dm = text_module(glue_root, tokenizer_dir, val_file="train.tsv")
    dm.setup("test")
    quote_id = TINY_VOCAB.index('"')
    for dataset, sentence in zip(
        (dm.val_dataset, dm.test_dataset), GLUE_QUOTE_SENTENCES, strict=True
    ):
        encoding, label = dataset[0]
        assert label == 0
        assert encoding["input_ids"].count(quote_id) == sentence.count('"')
        assert len(encoding["input_ids"]) == len(sentence.split()) + 2 + sentence.count("'")


def test_text_missing_root(tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"(?s)'.*nowhere' does not exist.*SST-2\.zip"):
        text_module(tmp_path / "nowhere", tokenizer_dir)


def test_text_missing_tsv(glue_root: Path, tokenizer_dir: Path) -> None:
    (glue_root / "dev.tsv").unlink()
    with pytest.raises(DataNotFoundError, match=r"(?s)Test file '.*dev\.tsv' does not exist.*GLUE"):
        text_module(glue_root, tokenizer_dir)
    with pytest.raises(DataNotFoundError, match=r"Validation file '.*val\.tsv' does not exist"):
        text_module(glue_root, tokenizer_dir, val_file="val.tsv", test_file="train.tsv")


def test_text_missing_column(glue_root: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"Column\(s\) \['text'\] not found .* columns are \['sentence', 'label'\]",
    ):
        text_module(glue_root, tokenizer_dir, text_column="text")


@pytest.mark.parametrize("bad", ["positive", "-1", "1.5"])
def test_text_bad_label(glue_root: Path, tokenizer_dir: Path, bad: str) -> None:
    lines = (glue_root / "train.tsv").read_text().splitlines()
    lines[4] = f"a good film\t{bad}"  # file line 5
    (glue_root / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"Invalid label '{bad}' in '.*train\.tsv' line 5"):
        text_module(glue_root, tokenizer_dir)


def test_text_label_out_of_range(glue_root: Path, tokenizer_dir: Path) -> None:
    lines = (glue_root / "dev.tsv").read_text().splitlines()
    lines[2] = "a good film\t2"  # file line 3
    (glue_root / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"Invalid label 2 in '.*dev\.tsv' line 3.*\[0, 2\)"):
        text_module(glue_root, tokenizer_dir)


def test_text_bad_tokenizer_path(glue_root: Path, tmp_path: Path) -> None:
    for bad in (tmp_path / "no" / "such" / "tokenizer", tmp_path):
        with pytest.raises(
            DataNotFoundError,
            match=r"(?s)Could not load the tokenizer.*Pass `tokenizer` as a local folder",
        ):
            text_module(glue_root, bad)


def test_text_invalid_val_fraction(glue_root: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"val_fraction must be a number in \[0, 1\)"):
        text_module(glue_root, tokenizer_dir, val_fraction=2)


def test_image_folder_takes_preprocessing_from_the_backbone(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images")
    timm_input = backbone_preprocessing("vit_base_patch32_224")
    timm_module = ImageFolderDataModule(str(root), preprocessing=timm_input)
    assert (timm_module.image_size, timm_module.mean) == (224, (0.5, 0.5, 0.5))
    tv_input = backbone_preprocessing("vit_b_32")
    tv_module = ImageFolderDataModule(str(root), preprocessing=tv_input, image_size=32)
    assert (tv_module.image_size, tv_module.mean) == (32, (0.485, 0.456, 0.406))
    default = ImageFolderDataModule(str(root))  # no backbone known: ImageNet's 224 px
    assert (default.image_size, default.std) == (224, (0.229, 0.224, 0.225))
    with pytest.raises(ConfigError, match="yields images, but the backbone takes text"):
        ImageFolderDataModule(str(root), preprocessing=backbone_preprocessing("bert-base-uncased"))


def test_backbone_preprocessing_per_family(tmp_path: Path) -> None:
    """The backbone owns its input format: images get size and normalisation, BERT its
    tokenizer (a pretrained folder first), the audio backbone and unknown names none."""
    assert backbone_preprocessing("vit_b_32") == ImagePreprocessing(
        224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
    assert backbone_preprocessing("bert-base-uncased") == TextPreprocessing("bert-base-uncased")
    folder = str(tmp_path / "bert")
    assert backbone_preprocessing("bert-base-uncased", folder) == TextPreprocessing(folder)
    assert backbone_preprocessing("ast") is None
    assert backbone_preprocessing("no-such-backbone") is None
