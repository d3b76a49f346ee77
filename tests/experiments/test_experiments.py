"""The issue 8 experiment scripts on tiny fake data in the real formats: the SST-2 grid (LR search
on validation only, seeds, resume, determinism), the CIFAR-10 appendix J pipeline (archive
subset, backbone export, fine-tuning from it) and the results generator."""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import shutil
import statistics
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from experiments import (
    cifar10_appendix_j,
    compare_rerun,
    keep_records,
    make_results,
    sst2_grid,
)
from experiments.runner import best_validation_row
from lorae.backbones import create_backbone
from lorae.cli.compose import load_composed
from lorae.data import TextClassificationDataModule
from lorae.module import EnsembleClassifier
from tests.fixtures.builders import (
    glue_sentences,
    write_glue_tsv,
    write_image_folder,
    write_tiny_tokenizer,
)
from tests.fixtures.models import TINY_BACKBONES

REPO = Path(__file__).resolve().parents[2]
TINY_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``data/sst2`` (GLUE TSV), ``data/agnews/dev.tsv`` (no header) and a tokenizer."""
    root = tmp_path_factory.mktemp("text")
    write_glue_tsv(root / "data" / "sst2", n_train=40, n_dev=30)
    news = root / "data" / "agnews"
    news.mkdir()
    (news / "dev.tsv").write_text(
        "".join(f"{s}\tWorld\n" for s in glue_sentences(12, seed=7)), encoding="utf-8"
    )
    return root / "data", write_tiny_tokenizer(root / "tokenizer")


def tiny_text_overrides(tokenizer: Path) -> list[str]:
    overrides = json.dumps(TINY_BACKBONES["hf_bert"][1])
    return [
        "model.method.init_args.pretrained=false",
        f"model.method.init_args.backbone_overrides={overrides}",
        f"data.init_args.tokenizer={tokenizer}",
        "plots=false",
    ]


def grid_args(data: Path, tokenizer: Path, output: Path) -> list[str]:
    return [
        "--data",
        str(data),
        "--output",
        str(output),
        "--methods",
        "single_lora",
        "lora_ensemble",
        "--share-lr",
        "lora_ensemble=single_lora",
        "--lrs",
        "0.05",
        "0.002",
        "--seeds",
        "0",
        "1",
        "--epochs",
        "2",
        "--mode",
        "in-process",
        "--override",
        *tiny_text_overrides(tokenizer),
    ]


def val_nll_by_epoch(metrics_csv: Path) -> list[float]:
    with metrics_csv.open(newline="") as handle:
        return [float(r["val/nll"]) for r in csv.DictReader(handle) if r.get("val/nll")]


def test_grid_selects_on_validation_tests_seeds_and_resumes(
    text_data: tuple[Path, Path], tmp_path: Path
) -> None:
    data, tokenizer = text_data
    output = tmp_path / "grid"
    assert sst2_grid.main(grid_args(data, tokenizer, output)) == 0

    # Stage 1: the choice is the LR with the lowest best-epoch val/nll, recomputed from the
    # CSV logs here; the search runs never reach the test split.
    selections = json.loads((output / "lr_selection.json").read_text())
    selection = selections["single_lora"]
    best = {}
    for lr in (0.05, 0.002):
        folder = output / "lr_search" / "single_lora" / sst2_grid.lr_label(lr)
        best[lr] = min(val_nll_by_epoch(folder / "csv" / "metrics.csv"))
        assert not (folder / "metrics.json").exists()
        header = (folder / "csv" / "metrics.csv").read_text().splitlines()[0]
        assert "test/" not in header
        assert not (folder / "checkpoints").exists()  # search checkpoints are removed
    assert selection["lr"] == min(best, key=best.__getitem__)
    assert selection["value"] == pytest.approx(min(best.values()))
    # --share-lr: LoRA-Ensemble reuses the single LoRA network's choice, without a search.
    assert selections["lora_ensemble"]["shared_from"] == "single_lora"
    assert selections["lora_ensemble"]["lr"] == selection["lr"]
    assert not (output / "lr_search" / "lora_ensemble").exists()
    shared_run = json.loads((output / "runs" / "lora_ensemble" / "seed0" / "run.json").read_text())
    assert f"--model.optimizer.init_args.lr={selection['lr']}" in shared_run["command"]

    # Stage 2: one tested run per seed at the chosen LR, with its wall time.
    runs = output / "runs" / "single_lora"
    reports = {}
    for seed in (0, 1):
        report = json.loads((runs / f"seed{seed}" / "metrics.json").read_text())
        assert {"test/acc", "test/nll", "test/ood/agnews/msp/auroc"} <= set(report["metrics"])
        run = json.loads((runs / f"seed{seed}" / "run.json").read_text())
        assert run["returncode"] == 0 and run["wall_seconds"] > 0 and run["seed"] == seed
        assert f"--model.optimizer.init_args.lr={selection['lr']}" in run["command"]
        reports[seed] = report["metrics"]
    assert reports[0]["test/nll"] != reports[1]["test/nll"]  # the seed changes the run

    # Resume: finished cells are skipped; an interrupted cell (no metrics.json) reruns and,
    # being deterministic, reproduces its numbers.
    kept = runs / "seed0" / "metrics.json"
    kept_mtime = kept.stat().st_mtime_ns
    (runs / "seed1" / "metrics.json").unlink()
    search_marker = output / "lr_search" / "single_lora" / "lr2e-03" / "validation.json"
    search_mtime = search_marker.stat().st_mtime_ns
    assert sst2_grid.main(grid_args(data, tokenizer, output)) == 0
    assert kept.stat().st_mtime_ns == kept_mtime
    assert search_marker.stat().st_mtime_ns == search_mtime
    rerun = json.loads((runs / "seed1" / "metrics.json").read_text())["metrics"]
    for key in ("test/acc", "test/nll", "test/ece", "test/ood/agnews/msp/auroc"):
        assert rerun[key] == reports[1][key], key


def test_grid_dry_run_lists_every_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--data", str(tmp_path / "data"), "--output", str(tmp_path / "grid"), "--dry-run"]
    args += ["--methods", "single_lora", "batch_ensemble", "mc_dropout", "--seeds", "4", "5"]
    args += ["--jobs", "2", "--share-lr", "mc_dropout=batch_ensemble"]
    assert sst2_grid.main([*args, "--lrs", "0.1", "0.2", "0.3"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lorae")]
    assert len(commands) == 2 * 3 + 3 * 2  # 3 search runs for 2 methods, 2 seeds for all 3
    search = [c for c in commands if "--test_after_fit=false" in c]
    assert len(search) == 6 and all("--seed_everything=0" in c for c in search)
    assert not any("mc_dropout.yaml" in c for c in search)
    assert sum("--seed_everything=5" in c and "batch_ensemble.yaml" in c for c in commands) == 1
    assert not (tmp_path / "grid" / "lr_selection.json").exists()
    with pytest.raises(SystemExit, match="--jobs > 1 needs --mode subprocess"):
        sst2_grid.main([*args, "--mode", "in-process"])
    with pytest.raises(SystemExit, match="is not in --methods"):
        sst2_grid.main([*args, "--share-lr", "mc_dropout=single_network"])
    # --fixed-lr: no search, every seed at that rate.
    fixed = args[: args.index("--share-lr")]
    assert sst2_grid.main([*fixed, "--fixed-lr", "0.0001"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lorae")]
    assert len(commands) == 3 * 2
    assert all("--test_after_fit=true" in c and "lr=0.0001 " in c for c in commands)
    with pytest.raises(SystemExit, match="drop --lrs and --share-lr"):
        sst2_grid.main([*args, "--fixed-lr", "0.0001"])


def test_best_validation_row_reads_validation_rows_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss,val/acc,val/nll,test/nll\n"
        "0,9,0.7,,,\n"
        "0,9,,0.60,0.50,\n"
        "1,19,,0.55,0.40,\n"
        "2,29,,0.70,0.45,\n"
        "2,29,,,,0.01\n"
    )
    assert best_validation_row(path) == {"epoch": 1.0, "val/acc": 0.55, "val/nll": 0.40}
    assert best_validation_row(path, "val/acc", "max")["epoch"] == 2.0
    candidates = {1e-3: {"val/nll": 0.4, "val/acc": 0.6}, 1e-4: {"val/nll": 0.3, "val/acc": 0.5}}
    assert sst2_grid.select_lr(candidates, "val/nll")[0] == 1e-4
    assert sst2_grid.select_lr(candidates, "val/acc")[0] == 1e-3


def test_text_subsets_are_fixed_and_disjoint(text_data: tuple[Path, Path]) -> None:
    data, tokenizer = text_data

    def module(seed: int) -> TextClassificationDataModule:
        return TextClassificationDataModule(
            str(data / "sst2"),
            str(tokenizer),
            train_limit=15,
            test_val_fraction=0.3,
            test_limit=12,
            ood_file="../agnews/dev.tsv",
            ood_limit=5,
            seed=seed,
        )

    first, other_seed = module(0), module(3)
    lines = {split: first._tables[split].lines for split in ("train", "val", "test")}
    assert len(lines["train"]) == 15 and len(lines["val"]) == 9 and len(lines["test"]) == 12
    assert not set(lines["val"]) & set(lines["test"])  # disjoint parts of dev.tsv
    assert first._tables["val"].path == first._tables["test"].path == data / "sst2" / "dev.tsv"
    for split, split_lines in lines.items():  # the run seed does not move the subsets
        assert other_seed._tables[split].lines == split_lines
    assert len(first.evaluation_sets[0].dataset) == 5
    with pytest.raises(Exception, match="either val_file or test_val_fraction"):
        TextClassificationDataModule(
            str(data / "sst2"), str(tokenizer), val_file="dev.tsv", test_val_fraction=0.2
        )


@pytest.mark.parametrize(
    "config",
    [
        p
        for folder in ("sst2_minilm", "cifar10_scratch")
        for p in sorted((REPO / "configs" / folder).glob("*.yaml"))
        if p.name != "base.yaml"  # the recipe the method files include, not run alone
    ],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_shipped_configs_name_real_options(config: Path) -> None:
    """Every class path of a shipped config imports and takes the config's init_args (the
    grid test runs one of them through the real CLI)."""
    loaded = load_composed(config)  # with its base.yaml merged in, as the CLI reads it
    entries = [
        loaded["model"]["method"],
        loaded["model"]["optimizer"],
        loaded["data"],
        *loaded["trainer"]["callbacks"],
        loaded["trainer"]["logger"],
    ]
    for entry in entries:
        module, _, name = entry["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        parameters = inspect.signature(cls).parameters
        unknown = set(entry.get("init_args", {})) - set(parameters)
        assert not unknown, f"{entry['class_path']} has no option(s) {unknown}"
    assert set(loaded["model"]) - {"method", "optimizer"} <= set(
        inspect.signature(EnsembleClassifier).parameters
    )


def test_cifar_pipeline_exports_a_loadable_backbone(tmp_path: Path) -> None:
    source = write_image_folder(tmp_path / "src", per_class=8, size=16, splits=("train",))
    archive = tmp_path / "train.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "train", arcname="train")
    output = tmp_path / "out"
    args = [
        "--data",
        str(archive),
        "--output",
        str(output),
        "--per-class",
        "6",
        "--pretrain-epochs",
        "1",
        "--seeds",
        "0",
        "--methods",
        "lora_ensemble",
        "--mode",
        "in-process",
        "--override",
        f"model.method.init_args.backbone_overrides={json.dumps(TINY_VIT)}",
        "data.init_args.image_size=16",
        "plots=false",
    ]
    assert cifar10_appendix_j.main(args) == 0
    for name in ("cat", "dog", "frog"):
        assert len(list((output / "data" / "train" / name).glob("*.jpg"))) == 6
    backbone = output / "backbone.safetensors"
    pretrained = torch.load(output / "pretrain" / "checkpoints" / "best.ckpt", weights_only=True)[
        "state_dict"
    ]
    loaded = create_backbone("vit_tiny_patch16_224", str(backbone), TINY_VIT).model.state_dict()
    prefix = cifar10_appendix_j.BACKBONE_PREFIX
    assert loaded.keys() == {k.removeprefix(prefix) for k in pretrained if k.startswith(prefix)}
    for key, value in loaded.items():
        assert torch.equal(value, pretrained[prefix + key]), key
    # LoRA-Ensemble fine-tuned from it: its frozen base weights are the exported ones.
    finetuned = torch.load(
        output / "runs" / "lora_ensemble" / "seed0" / "checkpoints" / "best.ckpt",
        weights_only=True,
    )["state_dict"]
    key = "patch_embed.proj.weight"
    assert torch.equal(finetuned[prefix + key], loaded[key])
    report = json.loads((output / "runs" / "lora_ensemble" / "seed0" / "metrics.json").read_text())
    assert report["method"]["num_members"] == 4 and "test/acc" in report["metrics"]
    # A second call skips everything and keeps the exported file.
    mtime = backbone.stat().st_mtime_ns
    assert cifar10_appendix_j.main(args) == 0
    assert backbone.stat().st_mtime_ns == mtime


def fake_run(folder: Path, method: dict[str, Any], metrics: dict[str, float], seed: int) -> None:
    folder.mkdir(parents=True)
    report = {
        "metrics": metrics,
        "method": method,
        "compute": {"parameters": {"total": 1000, "trainable": 10 * method["num_members"]}},
    }
    (folder / "metrics.json").write_text(json.dumps(report))
    (folder / "run.json").write_text(json.dumps({"seed": seed, "wall_seconds": 60.0 + seed}))
    (folder / "reliability.png").write_bytes(b"\x89PNG fake")


def test_results_doc_from_metrics_keeps_discussion(tmp_path: Path) -> None:
    sst2 = tmp_path / "sst2"
    accs = {"lora_ensemble": [0.81, 0.84, 0.86], "single_network": [0.79, 0.80, 0.83]}
    for name, values in accs.items():
        method = {"method": "X", "num_members": 4 if name == "lora_ensemble" else 1}
        for seed, acc in enumerate(values):
            metrics = {"test/acc": acc, "test/nll": 0.4, "test/ood/agnews/msp/auroc": 0.7}
            fake_run(sst2 / "runs" / name / f"seed{seed}", method, metrics, seed)
    discussion = tmp_path / "discussion.md"
    discussion.write_text("LoRA-Ensemble agrees with Tab. 8 on calibration; a unique sentence.")
    doc = tmp_path / "docs" / "results.md"
    grid = {"data": "/d", "output": "runs/s", "precision": "bf16-mixed", "epochs": 1}
    grid |= {"seeds": [0, 1, 2], "jobs": 2, "threads": 1, "test_limit": None}
    (sst2 / "grid.json").write_text(json.dumps(grid))
    gpu = tmp_path / "gpu" / "cifar10_j"
    (gpu.parent).mkdir(parents=True)
    (gpu.parent / "env.txt").write_text("GPU 0: NVIDIA H200 (UUID: x)\n")
    for seed, acc in enumerate([0.5, 0.6]):
        metrics = {"test/acc": acc}
        fake_run(gpu / "runs" / "lora_ensemble" / f"seed{seed}", {"num_members": 4}, metrics, seed)
    args = ["--sst2", str(sst2), "--cifar10", str(tmp_path / "none"), "--output", str(doc)]
    args += ["--discussion", str(discussion), "--cifar10-device", str(gpu)]
    assert make_results.main(args) == 0
    text = doc.read_text()
    # the command that made the grid, rebuilt from its grid.json (defaults left out)
    assert (
        "python experiments/sst2_grid.py --data /d --output runs/s --precision bf16-mixed "
        "--epochs 1 --jobs 2\n" in text
    )
    gpu_part = text.split("on a GPU (cross-check)")[1]
    assert "NVIDIA H200" in gpu_part and "| lora_ensemble | 0,1 | 0.5500 ± 0.0707 |" in gpu_part
    for name, values in accs.items():
        expected = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} | 0,1,2 |"))
        assert expected in row and "0.7000" in row
    assert "a unique sentence" in text
    assert "No runs yet" in text and "cifar10_appendix_j.py" in text  # missing experiment
    figure = doc.parent / "figures" / "results" / "sst2_lora_ensemble_reliability.png"
    assert figure.is_file() and "figures/results/sst2_lora_ensemble_reliability.png" in text
    # Regenerating after new runs changes the numbers and keeps the discussion.
    fake_run(
        sst2 / "runs" / "single_network" / "seed3",
        {"method": "X", "num_members": 1},
        {"test/acc": 0.5},
        3,
    )
    assert make_results.main(args) == 0
    again = doc.read_text()
    assert "| single_network | 0,1,2,3 |" in again and "a unique sentence" in again
    # Without the runs, --discussion-only swaps the discussion and keeps every table.
    shutil.rmtree(sst2)
    discussion.write_text("A rewritten discussion.")
    assert make_results.main([*args, "--discussion-only"]) == 0
    updated = doc.read_text()
    assert (
        updated.split(make_results.DISCUSSION_MARKER)[0]
        == again.split(make_results.DISCUSSION_MARKER)[0]
    )
    assert updated.endswith("A rewritten discussion.\n") and "a unique sentence" not in updated


def fake_cifar(folder: Path, accs: dict[str, list[float]], pretrain_acc: float) -> None:
    """A CIFAR-10 pipeline folder: runs per method and seed, and a pretraining report."""
    for name, values in accs.items():
        for seed, acc in enumerate(values):
            metrics = {"test/acc": acc, "test/f1": acc - 0.01, "test/nll": 1.4 + seed / 100}
            fake_run(folder / "runs" / name / f"seed{seed}", {"num_members": 4}, metrics, seed)
    (folder / "pretrain").mkdir(parents=True)
    pretrain = {"metrics": {"test/acc": pretrain_acc, "test/nll": 1.41}}
    (folder / "pretrain" / "metrics.json").write_text(json.dumps(pretrain))


def test_compare_rerun_finds_identical_and_changed_rows(tmp_path: Path) -> None:
    accs = {"lora_ensemble": [0.497, 0.498, 0.496], "single_network": [0.49, 0.495, 0.492]}
    original = tmp_path / "original"
    fake_cifar(original, accs, pretrain_acc=0.502)
    doc = tmp_path / "results.md"
    args = ["--sst2", str(tmp_path / "none"), "--cifar10", str(original), "--output", str(doc)]
    assert make_results.main([*args, "--cifar10-device", str(tmp_path / "none")]) == 0

    # A rerun of one method with the same numbers, and the pretraining: all identical.
    rerun = tmp_path / "rerun"
    fake_cifar(rerun, {"lora_ensemble": accs["lora_ensemble"]}, pretrain_acc=0.502)
    (rerun / "env.txt").write_text("Intel Xeon, torch 2.14.1, one thread per run\n")
    out = tmp_path / "reproducibility.md"

    def compare(folder: Path) -> tuple[int, str]:
        status = compare_rerun.main(
            ["--cifar10", str(folder), "--reference", str(doc), "--output", str(out)]
        )
        return status, out.read_text()

    status, text = compare(rerun)
    assert status == 0
    assert "**2 of 2 rows are identical.**" in text
    assert "on Intel Xeon, torch 2.14.1, one thread per run," in text
    assert "| cifar10 | lora_ensemble | 0,1,2 | identical | 0 | identical |" in text
    assert "| cifar10 | pretrain | 0 | identical | 0 | n/a |" in text

    # One seed's accuracy moves by 0.003: that row differs, by the change of its mean and std.
    shutil.rmtree(rerun / "runs" / "lora_ensemble" / "seed0")
    metrics = {"test/acc": 0.500, "test/f1": 0.487, "test/nll": 1.4}
    fake_run(rerun / "runs" / "lora_ensemble" / "seed0", {"num_members": 4}, metrics, 0)
    status, text = compare(rerun)
    assert status == 1
    assert "**1 of 2 rows are identical.**" in text
    # (fake_run writes the same fake figure again: the figure check still says identical)
    assert "| cifar10 | lora_ensemble | 0,1,2 | differs | 0.0010 | identical |" in text
    assert "- reference: `| lora_ensemble | 0,1,2 | 0.4970 ± 0.0010 |" in text
    assert "- rerun:     `| lora_ensemble | 0,1,2 | 0.4980 ± 0.0020 |" in text

    # A method the reference does not have is reported, not matched to another.
    fake_cifar(tmp_path / "other", {"explicit_ensemble": [0.4, 0.4]}, pretrain_acc=0.502)
    status, text = compare(tmp_path / "other")
    assert status == 1
    assert "| cifar10 | explicit_ensemble | 0,1 | not in the reference | n/a | n/a |" in text
    # A seed-0 figure that is not the same file is reported.
    (rerun / "runs" / "lora_ensemble" / "seed0" / "reliability.png").write_bytes(b"\x89PNG other")
    status, text = compare(rerun)
    assert status == 1 and "| differs | 0.0010 | differ |" in text


def test_compare_rerun_without_runs_says_what_is_missing(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("## CIFAR-10 from scratch\n")
    with pytest.raises(SystemExit, match="no finished runs"):
        compare_rerun.main(["--cifar10", str(tmp_path), "--reference", str(doc)])


def test_kept_records_regenerate_the_same_document(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fake_cifar(run, {"lora_ensemble": [0.49, 0.5], "single_network": [0.48, 0.47]}, 0.502)
    (run / "env.txt").write_text("a CPU\n")
    seed0 = run / "runs" / "lora_ensemble" / "seed0"
    (seed0 / "checkpoints").mkdir()
    (seed0 / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    (seed0 / "checkpoints" / "meta.json").write_text("{}")
    (seed0 / "lorae.log").write_text("log")
    records = tmp_path / "records"
    assert keep_records.main([str(run), str(records)]) == 0
    kept = {p.relative_to(records).as_posix() for p in records.rglob("*") if p.is_file()}
    assert "runs/lora_ensemble/seed0/metrics.json" in kept and "env.txt" in kept
    assert "runs/lora_ensemble/seed0/reliability.png" in kept
    assert "runs/lora_ensemble/seed1/reliability.png" not in kept  # only seed 0's are linked
    assert "runs/lora_ensemble/seed1/metrics.json" in kept
    assert "pretrain/metrics.json" in kept
    assert not any("checkpoints" in k or k.endswith(".log") for k in kept)

    def document(folder: Path, doc: Path) -> str:
        none = str(tmp_path / "none")
        args = ["--sst2", none, "--cifar10", str(folder), "--cifar10-device", none]
        assert make_results.main([*args, "--output", str(doc)]) == 0
        return doc.read_text()

    assert document(records, tmp_path / "a" / "results.md") == document(
        run, tmp_path / "b" / "results.md"
    )
    with pytest.raises(SystemExit):
        keep_records.main([str(tmp_path / "missing"), str(records)])


def test_records_over_the_size_cap_are_reported_not_copied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run" / "runs" / "bayes_lora" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"metrics": {}}\n')
    (run / "diversity.json").write_text("[" + "0.0," * keep_records.MAX_RECORD_BYTES + "0.0]\n")
    records = tmp_path / "records"
    assert keep_records.main([str(tmp_path / "run"), str(records)]) == 0
    kept = records / "runs" / "bayes_lora" / "seed0"
    assert (kept / "metrics.json").is_file()
    assert not (kept / "diversity.json").exists()
    assert "not kept (over 1 MB): runs/bayes_lora/seed0/diversity.json" in capsys.readouterr().out
