"""AudioFolderDataModule: class folders and file-name patterns, group-aware splits, split
folders (train/val/test), the errors that name what is wrong, corrupt WAVs, and `lorae fit` with
a tiny AST on fake recordings."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchaudio")
soundfile = pytest.importorskip("soundfile")

from lorae.data import AudioFolderDataModule  # noqa: E402
from lorae.data.audio import LogMelFeatures  # noqa: E402
from lorae.errors import ConfigError, CorruptSampleError, DataNotFoundError  # noqa: E402

FSDD = r"(?P<label>\d+)_(?P<group>[a-z]+)_\d+\.wav"
SPEAKERS = ("ann", "bob", "cyd", "dan", "eve")
SMALL = {"num_mel_bins": 16, "target_length": 24, "freq_mask": 2, "time_mask": 4}


def _tone(path: Path, label: int, seed: int, rate: int = 8000, seconds: float = 0.2) -> None:
    """A 16-bit mono WAV: a sine tone whose pitch depends on ``label``, plus a little noise."""
    t = np.arange(int(rate * seconds)) / rate
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, 0.3 * np.sin(2 * np.pi * 150 * (1 + label) * t) + noise, rate, "PCM_16")


def write_pattern_folder(root: Path, labels: tuple[int, ...] = (0, 1, 2), takes: int = 2) -> Path:
    """FSDD's layout: ``root/<label>_<speaker>_<take>.wav`` for every speaker of SPEAKERS."""
    seed = 0
    for label in labels:
        for speaker in SPEAKERS:
            for take in range(takes):
                seed += 1
                _tone(root / f"{label}_{speaker}_{take}.wav", label, seed)
    return root


def write_class_folders(root: Path, classes: tuple[str, ...] = ("dog", "cat"), n: int = 5) -> Path:
    """``root/<class>/<i>.wav`` (one class nested one level deeper, which is allowed)."""
    for c, name in enumerate(classes):
        for i in range(n):
            sub = "extra/" if i == 0 else ""
            _tone(root / name / f"{sub}{i}.wav", c, 100 * c + i)
    return root


@pytest.fixture(scope="module")
def pattern_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pattern_folder(tmp_path_factory.mktemp("fsdd") / "train", labels=(0, 1, 2, 10))


def test_class_folders(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "clips")
    data = AudioFolderDataModule(str(root), test_fraction=0.2, val_fraction=0.25, **SMALL)
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    train, val, test = data.train_dataset, data.val_dataset, data.test_dataset
    assert (len(train), len(val), len(test)) == (6, 2, 2)
    files = [set(map(str, d.paths)) for d in (train, val, test)]  # type: ignore[attr-defined]
    assert set.union(*files) == {str(p) for p in root.rglob("*.wav")}
    assert sum(len(f) for f in files) == 10  # disjoint
    for dataset in (train, test):
        for path, label in zip(dataset.paths, dataset.labels, strict=True):  # type: ignore[attr-defined]
            assert data.class_names[label] in Path(path).relative_to(root).parts[0]
    x, y = test[0]
    assert x.shape == (1, 16, 24) and x.dtype == torch.float32 and isinstance(y, int)
    names = data.predict_sample_names()
    assert len(names) == 2 and all(n.split("/")[0] in ("cat", "dog") for n in names)
    assert data.split_groups() == {"train": [], "val": [], "test": []}


def test_pattern_labels_sorted_numerically_and_stored(pattern_root: Path) -> None:
    data = AudioFolderDataModule(str(pattern_root), pattern=FSDD, **SMALL)
    assert data.class_names == ["0", "1", "2", "10"]  # not "10" before "2"
    spec = data.inference_spec()
    assert spec.class_names == ("0", "1", "2", "10")
    assert spec.inputs.num_mel_bins == 16 and spec.inputs.target_length == 24
    for path, label in zip(data.paths, data.labels, strict=True):
        assert data.class_names[label] == path.name.split("_")[0]
    ordered = AudioFolderDataModule(
        str(pattern_root), pattern=FSDD, class_names=["10", "2", "1", "0"], **SMALL
    )
    assert ordered.labels == [3 - label for label in data.labels]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_split_is_disjoint_by_group(pattern_root: Path, seed: int) -> None:
    data = AudioFolderDataModule(
        str(pattern_root),
        pattern=FSDD,
        split_by="group",
        test_fraction=0.2,
        val_fraction=0.25,
        seed=seed,
        **SMALL,
    )
    groups = data.split_groups()
    assert [len(groups[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert sorted(groups["train"] + groups["val"] + groups["test"]) == sorted(SPEAKERS)
    seen = {}
    for split, dataset in zip(("train", "val", "test"), data._splits(), strict=True):
        speakers = {Path(p).name.split("_")[1] for p in dataset.paths}  # type: ignore[attr-defined]
        assert speakers == set(groups[split])
        seen[split] = speakers
    assert not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    assert len(data.paths) == sum(len(d) for d in data._splits())  # type: ignore[arg-type]


def test_named_held_out_groups(pattern_root: Path) -> None:
    data = AudioFolderDataModule(
        str(pattern_root),
        pattern=FSDD,
        split_by="group",
        test_groups=["ann", "eve"],
        val_groups=["bob"],
        **SMALL,
    )
    assert data.split_groups() == {"train": ["cyd", "dan"], "val": ["bob"], "test": ["ann", "eve"]}
    names = data.predict_sample_names()
    assert names and all(n.split("_")[1] in ("ann", "eve") for n in names)


def test_group_pattern_with_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "clips"
    for c, name in enumerate(("no", "yes")):
        for speaker in ("ann", "bob", "cyd"):
            _tone(root / name / f"{speaker}-{c}.wav", c, c)
    data = AudioFolderDataModule(
        str(root), pattern=r"(?P<group>[a-z]+)-\d\.wav", split_by="group", **SMALL
    )
    assert data.class_names == ["no", "yes"]
    groups = data.split_groups()
    assert len(groups["test"]) == 1 and len(groups["val"]) == 1 and len(groups["train"]) == 1


def test_split_folders_with_class_folders(tmp_path: Path) -> None:
    """``root/{train,val,test}/<class>/``: every file in the split of its folder, nothing
    carved; prediction names are relative to root."""
    root = tmp_path / "clips"
    write_class_folders(root / "train", n=4)
    write_class_folders(root / "val", n=2)
    write_class_folders(root / "test", n=3)
    data = AudioFolderDataModule(str(root), split_by="folder", **SMALL)
    assert data.class_names == ["cat", "dog"]
    for split, dataset, n in zip(("train", "val", "test"), data._splits(), (8, 4, 6), strict=True):
        paths = dataset.paths  # type: ignore[attr-defined]
        assert len(paths) == n
        assert all(Path(p).relative_to(root).parts[0] == split for p in paths)
        for path, label in zip(paths, dataset.labels, strict=True):  # type: ignore[attr-defined]
            assert Path(path).relative_to(root).parts[1] == data.class_names[label]
    names = data.predict_sample_names()
    assert len(names) == 6 and all(n.startswith("test/") for n in names)
    assert data.split_groups() == {"train": [], "val": [], "test": []}


def test_split_folders_with_a_pattern_and_no_val_folder(tmp_path: Path) -> None:
    """Pattern-named files in ``train/`` and ``test/``: validation is ``val_fraction`` of the
    training files (by file, with the seed), groups come from the names."""
    root = tmp_path / "fsdd"
    write_pattern_folder(root / "train", takes=4)  # 3 labels x 5 speakers x 4 takes
    write_pattern_folder(root / "test", takes=1)
    data = AudioFolderDataModule(
        str(root), pattern=FSDD, split_by="folder", val_fraction=0.25, **SMALL
    )
    train, val, test = (set(map(str, d.paths)) for d in data._splits())  # type: ignore[attr-defined]
    assert (len(train), len(val), len(test)) == (45, 15, 15)
    assert not train & val and train | val == {str(p) for p in (root / "train").glob("*.wav")}
    assert test == {str(p) for p in (root / "test").glob("*.wav")}
    groups = data.split_groups()
    assert groups["train"] == groups["test"] == sorted(SPEAKERS)  # speakers may be shared
    again = AudioFolderDataModule(
        str(root), pattern=FSDD, split_by="folder", val_fraction=0.25, **SMALL
    )
    assert set(map(str, again.val_dataset.paths)) == val  # type: ignore[attr-defined]


def test_split_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "clips"
    write_class_folders(root / "train", n=2)
    with pytest.raises(DataNotFoundError, match=r"no folder\(s\) \['test'\]"):
        AudioFolderDataModule(str(root), split_by="folder", **SMALL)
    write_class_folders(root / "test", classes=("dog", "bird"), n=1)
    with pytest.raises(ConfigError, match=r"Class\(es\) \['bird'\] have files in .*test"):
        AudioFolderDataModule(str(root), split_by="folder", **SMALL)
    shutil.rmtree(root / "test" / "bird")
    _tone(root / "stray.wav", 0, 0)
    with pytest.raises(ConfigError, match=r"1 WAV file\(s\) .*outside its split folders"):
        AudioFolderDataModule(str(root), split_by="folder", **SMALL)
    (root / "stray.wav").unlink()
    assert len(AudioFolderDataModule(str(root), split_by="folder", **SMALL).test_dataset) == 1
    with pytest.raises(ConfigError, match="need split_by: group"):
        AudioFolderDataModule(str(root), split_by="folder", test_groups=["ann"], **SMALL)
    with pytest.raises(ConfigError, match="'sample', 'group' or 'folder'"):
        AudioFolderDataModule(str(root), split_by="folders", **SMALL)  # type: ignore[arg-type]


def test_features_are_the_shared_log_mel_pipeline(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "clips")
    data = AudioFolderDataModule(str(root), augment=False, sample_rate=8000, **SMALL)
    features = LogMelFeatures(8000, 16, 24, 0, 0, data.features.mean, data.features.std)
    x, _ = data.train_dataset[0]
    assert torch.equal(x, features(data.train_dataset.paths[0], train=False))  # type: ignore[attr-defined]


def test_errors_name_what_is_wrong(tmp_path: Path, pattern_root: Path) -> None:
    with pytest.raises(DataNotFoundError, match="does not exist"):
        AudioFolderDataModule(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="No WAV files"):
        AudioFolderDataModule(str(tmp_path / "empty"), pattern=FSDD)
    with pytest.raises(DataNotFoundError, match="No class folders"):
        AudioFolderDataModule(str(tmp_path / "empty"))
    root = write_class_folders(tmp_path / "folders")
    (root / "bird").mkdir()
    with pytest.raises(DataNotFoundError, match=r"class folder\(s\) \['bird'\]"):
        AudioFolderDataModule(str(root))

    odd = write_pattern_folder(tmp_path / "odd")
    _tone(odd / "notes" / "hello.wav", 0, 0)
    with pytest.raises(ConfigError, match=r"'hello\.wav'.*does not match pattern") as error:
        AudioFolderDataModule(str(odd), pattern=FSDD)
    assert FSDD in str(error.value)
    with pytest.raises(ConfigError, match="not a regular expression"):
        AudioFolderDataModule(str(pattern_root), pattern="(?P<label>")
    with pytest.raises(ConfigError, match="neither"):
        AudioFolderDataModule(str(pattern_root), pattern=r"\d_.*\.wav")

    with pytest.raises(DataNotFoundError, match=r"Class\(es\) \['7'\].*no WAV file"):
        AudioFolderDataModule(
            str(pattern_root), pattern=FSDD, class_names=["0", "1", "2", "10", "7"]
        )
    with pytest.raises(ConfigError, match=r"Label\(s\) \['10'\].*not in class_names"):
        AudioFolderDataModule(str(pattern_root), pattern=FSDD, class_names=["0", "1", "2"])


def test_impossible_group_splits(tmp_path: Path, pattern_root: Path) -> None:
    with pytest.raises(ConfigError, match="needs a `pattern` with a"):
        AudioFolderDataModule(str(write_class_folders(tmp_path / "f")), split_by="group")
    one = tmp_path / "one"
    for label in (0, 1):
        _tone(one / f"{label}_ann_0.wav", label, label)
    with pytest.raises(ConfigError, match=r"only 1 group\(s\) \['ann'\]"):
        AudioFolderDataModule(str(one), pattern=FSDD, split_by="group")
    with pytest.raises(ConfigError, match=r"validation fraction 0\.9 out of the 2 group"):
        AudioFolderDataModule(
            str(pattern_root), pattern=FSDD, split_by="group", test_fraction=0.6, val_fraction=0.9
        )
    with pytest.raises(ConfigError, match="leaves no group for training"):
        AudioFolderDataModule(
            str(pattern_root),
            pattern=FSDD,
            split_by="group",
            test_groups=["ann", "bob", "cyd"],
            val_groups=["dan", "eve"],
        )
    with pytest.raises(ConfigError, match=r"test_groups \['zoe'\] are not groups"):
        AudioFolderDataModule(
            str(pattern_root), pattern=FSDD, split_by="group", test_groups=["zoe"]
        )
    with pytest.raises(ConfigError, match="in both test_groups and val_groups"):
        AudioFolderDataModule(
            str(pattern_root),
            pattern=FSDD,
            split_by="group",
            test_groups=["ann"],
            val_groups=["ann"],
        )
    with pytest.raises(ConfigError, match="need split_by: group"):
        AudioFolderDataModule(str(pattern_root), pattern=FSDD, test_groups=["ann"])


def test_corrupt_and_truncated_wavs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_class_folders(tmp_path / "clips", n=4)
    options = {"test_fraction": 0.1, "val_fraction": 0.0, "batch_size": 8, **SMALL}
    data = AudioFolderDataModule(str(root), **options)
    paths = data.train_dataset.paths  # type: ignore[attr-defined]
    broken, truncated = paths[1], paths[4]
    broken.write_bytes(b"RIFF....not audio")
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(CorruptSampleError, match=broken.name):
        data.train_dataset[1]
    with pytest.raises(CorruptSampleError, match=f"{truncated.name}' is truncated"):
        data.train_dataset[4]

    skipping = AudioFolderDataModule(str(root), skip_corrupt=True, **options)
    batches = list(skipping.train_dataloader())
    assert sum(len(target) for _, target in batches) == len(paths) - 2
    skipping.teardown("fit")
    err = capsys.readouterr().err
    assert broken.name in err and truncated.name in err and "skipped 2 corrupt" in err


def test_lorae_fit_with_a_tiny_ast(tmp_path: Path) -> None:
    """`lorae fit` + test on fake recordings: the checkpoint carries the class names and the
    log-mel settings, so `lorae predict` needs no config."""
    import yaml

    from lorae.checkpoints.inference import INFERENCE_KEY
    from lorae.cli import main

    root = write_pattern_folder(tmp_path / "train", labels=(3, 5, 7))
    backbone = {
        "source": "deit_tiny_distilled_patch16_224",
        "img_size": 32,
        "embed_dim": 16,
        "depth": 1,
        "num_heads": 2,
        "input_fdim": 16,
        "input_tdim": 24,
    }
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(tmp_path / "out"),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
                }
            ],
        },
        "model": {
            "method": {
                "class_path": "lorae.methods.LoRAEnsemble",
                "init_args": {
                    "backbone": "ast",
                    "pretrained": False,
                    "backbone_overrides": backbone,
                    "num_members": 2,
                    "lora": {"rank": 2},
                },
            },
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            "warmup_steps": 0,
        },
        "data": {
            "class_path": "lorae.data.AudioFolderDataModule",
            "init_args": {
                "root": str(root),
                "pattern": FSDD,
                "split_by": "group",
                "test_groups": ["eve"],
                "val_groups": ["dan"],
                "batch_size": 4,
                **SMALL,
            },
        },
    }
    path = tmp_path / "fsdd.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    main(["fit", "--config", str(path), "--test_after_fit=true"])
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    record = checkpoint[INFERENCE_KEY]
    assert record["class_names"] == ["3", "5", "7"]
    assert record["inputs"]["kind"] == "audio" and record["inputs"]["num_mel_bins"] == 16
    out = tmp_path / "pred.csv"
    main(
        [
            "predict",
            "--ckpt_path",
            str(tmp_path / "ckpt" / "last.ckpt"),
            "--data.predict_path",
            str(root),
            f"--prediction_writer.output_path={out}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(list(root.glob("*.wav")))
    assert {row["pred_name"] for row in rows} <= {"3", "5", "7"}
