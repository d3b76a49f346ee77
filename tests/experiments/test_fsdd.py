"""experiments/fsdd_ast.py: the index and speaker splits (disjoint parts, counts), their
extraction, the dry run, and that the shipped configs/fsdd read the folders it writes (no
training here; the CLI smoke test with a tiny AST is in tests/data/test_audio_folder.py)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from experiments import fsdd_ast, fsdd_results
from lorae.cli.compose import load_composed

#: FSDD's six speakers; the archive's recordings have indices 5-49.
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
FULL = range(5, 50)


def _names(indices: range = FULL, digits: int = 10) -> list[str]:
    return [f"train/{d}_{s}_{i}.wav" for d in range(digits) for s in SPEAKERS for i in indices]


def _key(name: str) -> tuple[str, int, int]:
    """(speaker, digit, index) of an archive member."""
    digit, speaker, index = Path(name).stem.split("_")
    return speaker, int(digit), int(index)


def _check_disjoint_cover(parts: dict[str, list[str]], names: list[str]) -> None:
    keys = Counter(_key(n) for files in parts.values() for n in files)
    assert set(keys) == {_key(n) for n in names}  # every recording in a part ...
    assert max(keys.values()) == 1  # ... and in one part only


def test_index_split_is_fsdds_convention() -> None:
    names = [*_names(), "train/README.txt", "other/0_george_5.wav"]
    parts = fsdd_ast.plan_split(names, fsdd_ast.SplitRule())
    _check_disjoint_cover(parts, _names())
    counts = {part: len(files) for part, files in parts.items()}
    assert counts == {"pretrain": 1200, "train": 900, "val": 240, "test": 360}
    ranges = {"pretrain": (5, 24), "train": (25, 39), "val": (40, 43), "test": (44, 49)}
    for part, files in parts.items():
        keys = [_key(n) for n in files]
        assert {k[0] for k in keys} == set(SPEAKERS)  # every speaker in every part
        assert {k[1] for k in keys} == set(range(10))
        low, high = ranges[part]
        assert {k[2] for k in keys} == set(range(low, high + 1))
        per_voice = Counter((k[0], k[1]) for k in keys)  # same share of each speaker and digit
        assert set(per_voice.values()) == {high - low + 1}


def test_speaker_split_holds_test_and_val_speakers_out_of_pretraining() -> None:
    rule = fsdd_ast.SplitRule(mode="speaker")
    parts = fsdd_ast.plan_split(_names(), rule)
    _check_disjoint_cover(parts, _names())
    counts = {part: len(files) for part, files in parts.items()}
    assert counts == {"pretrain": 600, "train": 750, "val": 450, "test": 900}
    speakers = {part: {_key(n)[0] for n in files} for part, files in parts.items()}
    assert speakers["test"] == {"theo", "yweweler"} and speakers["val"] == {"nicolas"}
    assert speakers["pretrain"] == speakers["train"] == {"george", "jackson", "lucas"}
    assert max(_key(n)[2] for n in parts["pretrain"]) == 24
    assert min(_key(n)[2] for n in parts["train"]) == 25


def test_split_errors() -> None:
    with pytest.raises(SystemExit, match="index borders"):
        fsdd_ast.SplitRule(pretrain_max_index=39, val_min_index=40)
    with pytest.raises(SystemExit, match="index borders"):
        fsdd_ast.SplitRule(val_min_index=44, test_min_index=44)
    with pytest.raises(SystemExit, match="both test and validation"):
        fsdd_ast.SplitRule(mode="speaker", val_speakers=("theo",))
    with pytest.raises(SystemExit, match="zoe"):
        fsdd_ast.plan_split(_names(), fsdd_ast.SplitRule(mode="speaker", val_speakers=("zoe",)))
    with pytest.raises(SystemExit, match="test part is empty"):
        fsdd_ast.plan_split(_names(range(5, 42)), fsdd_ast.SplitRule())
    with pytest.raises(SystemExit, match="pretrain part is empty"):
        fsdd_ast.plan_split(_names(), fsdd_ast.SplitRule(pretrain_max_index=4))


#: Borders for the small archive (indices 5-8): one index per part.
SMALL_RULE = fsdd_ast.SplitRule(pretrain_max_index=5, val_min_index=7, test_min_index=8)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    soundfile = pytest.importorskip("soundfile")
    path = tmp_path_factory.mktemp("fsdd") / "train.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for k, name in enumerate(_names(range(5, 9), digits=3)):
            buffer = io.BytesIO()
            tone = 0.3 * np.sin(np.arange(800) * 0.05 * (1 + k % 3))
            soundfile.write(buffer, tone, 8000, subtype="PCM_16", format="WAV")
            info = tarfile.TarInfo(name)
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
    return path


def test_extract_split_then_configs_read_it(archive: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchaudio")
    from lorae.data import AudioFolderDataModule

    target = tmp_path / "data"
    counts = fsdd_ast.extract_split(archive, target, SMALL_RULE)
    assert counts == {"pretrain": 18, "train": 18, "val": 18, "test": 18}
    for part, folder in fsdd_ast.PARTS.items():
        files = sorted(p.name for p in (target / folder).glob("*.wav"))
        assert (
            len(files) == 18
            and {_key(f)[2] for f in files}
            == {
                "pretrain": {5},
                "train": {6},
                "val": {7},
                "test": {8},
            }[part]
        )
    record = json.loads((target / "split.json").read_text())
    assert record["rule"] == SMALL_RULE.record() and record["folders"] == fsdd_ast.PARTS
    assert fsdd_ast.extract_split(Path("gone.tar.gz"), target, SMALL_RULE) == counts  # resumed
    with pytest.raises(SystemExit, match="another rule"):
        fsdd_ast.extract_split(archive, target, fsdd_ast.SplitRule())

    for config, part in (("lora_ensemble", "finetune"), ("pretrain", "pretrain")):
        options = load_composed(fsdd_ast.CONFIGS / f"{config}.yaml")["data"]["init_args"]
        options = {**options, "root": str(target / part)}
        data = AudioFolderDataModule(**options)
        assert data.class_names == ["0", "1", "2"]
        if part == "finetune":
            sizes = [len(d) for d in (data.train_dataset, data.val_dataset, data.test_dataset)]
            assert sizes == [18, 18, 18]
            for split in ("train", "val", "test"):  # the folders are the splits
                assert data.split_groups()[split] == sorted(SPEAKERS)
            assert all(n.startswith("test/") for n in data.predict_sample_names())
        else:
            assert len(data.test_dataset) == 2  # 10% of 18 files, by file
        x, _ = data.test_dataset[0]
        assert x.shape == (1, 64, 100)


def test_dry_run_lists_every_cell_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["--data", "missing.tar.gz", "--output", str(out), "--seeds", "0", "1", "--dry-run"]
    assert fsdd_ast.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "split by recording index" in lines[0] and "test >= 44" in lines[0]
    cells = [line for line in lines if line.startswith("[to run]")]
    assert len(cells) == 1 + 3 * 2
    assert "pretrain.yaml" in cells[0] and f"root={out / 'data' / 'pretrain'}" in cells[0]
    for line in cells[1:]:
        assert f"--model.method.init_args.pretrained={out / 'backbone.safetensors'}" in line
        assert f"root={out / 'data' / 'finetune'}" in line and "test_groups" not in line
    assert not out.exists()
    assert fsdd_ast.main([*argv, "--split", "speaker"]) == 0
    assert "split by speaker" in capsys.readouterr().out


def test_results_section_without_runs(tmp_path: Path) -> None:
    text = fsdd_results.fsdd_section(tmp_path)
    assert "No fine-tuning runs yet" in text and fsdd_results.FSDD_COMMAND in text


def test_results_section_describes_the_split(archive: Path, tmp_path: Path) -> None:
    fsdd_ast.extract_split(archive, tmp_path / "data", SMALL_RULE)
    text = fsdd_results.fsdd_section(tmp_path)
    assert SMALL_RULE.describe() in text and "18 test clips" in text


def fake_fsdd_runs(folder: Path, accs: dict[str, list[float]]) -> None:
    """Finished FSDD records: the pretraining run and each method's seeds."""
    pretrain = folder / "pretrain"
    pretrain.mkdir(parents=True)
    (pretrain / "metrics.json").write_text(json.dumps({"metrics": {"test/acc": 0.9083}}))
    (pretrain / "run.json").write_text(
        json.dumps({"command": ["lorae", "fit"], "wall_seconds": 250.0, "cpu_seconds": 480.0})
    )
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            run = folder / "runs" / method / f"seed{seed}"
            run.mkdir(parents=True)
            metrics = {"test/acc": acc, "test/ece": 0.07, "test/nll": 0.17 + seed / 100}
            report = {"metrics": metrics, "method": {}, "compute": {"train_seconds_per_epoch": 9}}
            (run / "metrics.json").write_text(json.dumps(report))
            command = ["lorae", "fit", f"--config=configs/fsdd/{method}.yaml", f"--seed={seed}"]
            record = {"method": method, "seed": seed, "command": command}
            record |= {"wall_seconds": 500.0 + seed, "cpu_seconds": 900.0, "threads": "2"}
            (run / "run.json").write_text(json.dumps(record))


def test_results_document_and_rerun_comparison(tmp_path: Path) -> None:
    """docs/results.md's FSDD section from records: mean ± std per method, every cell's wall
    time and command; compare_rerun finds identical and changed reruns; kept records
    regenerate the same section."""
    import statistics

    from experiments import compare_rerun, keep_records, make_results

    fsdd = tmp_path / "fsdd"
    accs = {"lora_ensemble": [0.964, 0.958, 0.97], "single_network": [0.95, 0.94, 0.945]}
    fake_fsdd_runs(fsdd, accs)
    doc = tmp_path / "docs" / "results.md"
    none = str(tmp_path / "none")
    args = ["--sst2", none, "--cifar10", none, "--cifar10-device", none, "--sst2-paper", none]
    args += ["--fsdd", str(fsdd), "--output", str(doc), "--discussion", none]
    assert make_results.main(args) == 0
    part = compare_rerun.section(doc.read_text(), "## FSDD")
    assert "The AST trained from scratch" in part and "Accuracy 0.9083" in part
    for method, values in accs.items():
        row = next(line for line in part.splitlines() if line.startswith(f"| {method} | 0,1,2 |"))
        assert f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" in row
    assert "| runs/lora_ensemble/seed2 | n/a | 2 | 1 | 502 | 900 | n/a |" in part
    assert "| pretrain | n/a | n/a | 1 | 250 | 480 | n/a |" in part
    assert "**all 7 cells**" in part
    assert "lorae fit --config=configs/fsdd/single_network.yaml --seed=1" in part
    assert fsdd_results.FSDD_COMMAND in part

    out = tmp_path / "reproducibility.md"
    compare_args = ["--fsdd", str(fsdd), "--reference", str(doc), "--output", str(out)]
    assert compare_rerun.main(compare_args) == 0
    assert "| fsdd | lora_ensemble | 0,1,2 | identical |" in out.read_text()
    assert "| fsdd | pretrain |" in out.read_text()
    changed = fsdd / "runs" / "single_network" / "seed1" / "metrics.json"
    changed.write_text(json.dumps({"metrics": {"test/acc": 0.5}, "method": {}, "compute": {}}))
    assert compare_rerun.main(compare_args) == 1
    assert "| fsdd | single_network | 0,1,2 | differs |" in out.read_text()

    records = tmp_path / "records"
    fake_fsdd_runs(tmp_path / "fresh", accs)
    assert keep_records.main([str(tmp_path / "fresh"), str(records)]) == 0
    again = tmp_path / "again.md"
    assert make_results.main([*args, "--fsdd", str(records), "--output", str(again)]) == 0
    assert compare_rerun.section(again.read_text(), "## FSDD") == part
