"""``lorae test`` evaluation end to end: OOD and shift sets, temperature scaling and sweep,
compute cost, figures; ``lorae predict`` uncertainty columns; ``lorae analyze`` and
``lorae aggregate`` on real checkpoints of a tiny model.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Dataset, TensorDataset

from lorae.cli import main
from lorae.cli.analyze import _build
from lorae.data import DigitsDataModule
from lorae.data.base import EvaluationSet
from lorae.evaluation.collect import collect_member_logits
from lorae.metrics.functional import predictive_probs
from tests.fixtures.tiny_configs import (
    checkpoint_callback,
    digits_lora_config,
    write_config,
)

DATA_CLASS = f"{__name__}.DigitsWithEvaluationSets"


class DigitsWithEvaluationSets(DigitsDataModule):
    """Digits plus one OOD set (uniform noise images, labels outside the classes) and one
    shift set (the test split with Gaussian pixel noise), as a data module of issue 4 would
    provide them."""

    def build_evaluation_sets(self) -> list[EvaluationSet]:
        test = self.test_dataset
        images = torch.stack([test[i][0] for i in range(len(test))])  # type: ignore[arg-type]
        labels = torch.tensor([int(test[i][1]) for i in range(len(test))])  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(1)
        noise = torch.rand(90, 1, 8, 8, generator=generator) * 2 - 1
        ood: Dataset[Any] = TensorDataset(noise, torch.full((90,), 99))  # targets are ignored
        shifted = images + 0.5 * torch.randn(images.shape, generator=generator)
        return [
            EvaluationSet("noise", "ood", ood),
            EvaluationSet("gaussian/2", "shift", TensorDataset(shifted, labels)),
        ]


def _config(tmp_path: Path, num_members: int = 3, seed: int = 0) -> Path:
    config = digits_lora_config(num_members=num_members, seed=seed)
    config["data"]["class_path"] = DATA_CLASS
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp_path / "ckpt")]
    return write_config(tmp_path / "config.yaml", config)


def _fit(tmp_path: Path, cfg: Path, seed: int = 0) -> Path:
    main(
        [
            "fit",
            "--config",
            str(cfg),
            f"--seed_everything={seed}",
            f"--trainer.default_root_dir={tmp_path / 'fit'}",
            "--trainer.max_steps=8",
            "--trainer.limit_val_batches=0",
        ]
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file()
    return last


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-member LoRA-Ensemble trained 8 steps on digits: (config, checkpoint)."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lorae"])
        cfg = _config(root)
        return cfg, _fit(root, cfg)


def _report(root: Path) -> dict[str, Any]:
    found = sorted(root.rglob("metrics.json"))
    assert len(found) == 1, found
    report: dict[str, Any] = json.loads(found[0].read_text())
    return report


def test_test_writes_ood_shift_calibration_sweep_and_cost(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, ckpt = trained
    out = tmp_path / "test"
    main(
        [
            "test",
            "--config",
            str(cfg),
            "--ckpt_path",
            str(ckpt),
            f"--trainer.default_root_dir={out}",
            "--calibrate=temperature",
            "--temperature_sweep=[0.5,2.0]",
            "--plots=true",
            "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
            f"--trainer.logger.init_args.save_dir={out}",
        ]
    )
    report = _report(out)
    metrics = report["metrics"]
    for prefix in ("", "calibrated/", "temperature/0.5/", "temperature/2/"):
        for name in ("acc", "ece", "nll", "brier", "f1"):
            assert f"test/{prefix}{name}" in metrics, f"test/{prefix}{name}"
        for score in ("msp", "entropy", "mi"):
            for kind in ("auroc", "auprc"):
                assert 0.0 <= metrics[f"test/{prefix}ood/noise/{score}/{kind}"] <= 1.0
        assert 0.0 <= metrics[f"test/{prefix}shift/gaussian/2/acc"] <= 1.0
    # Temperature does not change the argmax of a single member, but it does reweight the
    # members' average; accuracy stays close while NLL moves.
    assert metrics["test/temperature/2/nll"] != metrics["test/nll"]
    fitted = report["calibration"]
    assert fitted["method"] == "temperature" and fitted["temperature"] > 0
    assert metrics["test/calibrated/temperature"] == pytest.approx(fitted["temperature"])
    assert fitted["nll_after"] <= fitted["nll_before"] + 1e-9  # on the validation split
    assert report["evaluation_sets"] == [
        {"name": "noise", "kind": "ood"},
        {"name": "gaussian/2", "kind": "shift"},
    ]
    # ensemble-size curve: k = M is the full ensemble
    assert metrics["test/ensemble_size/3/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert metrics["test/ensemble_size/1/acc"] == pytest.approx(
        metrics["test/member_acc/0"], abs=1e-6
    )
    assert 0.0 <= metrics["test/diversity/disagreement"] <= 1.0
    assert 0.0 <= metrics["test/diversity/jsd"] <= 1.0
    compute = report["compute"]
    params = compute["parameters"]
    assert params["trainable"] < params["total"]
    assert params["trainable_per_member"] == pytest.approx(params["trainable"] / 3)
    assert compute["checkpoint_bytes"] == ckpt.stat().st_size
    assert compute["inference_seconds_per_sample"] > 0
    assert compute["train_seconds_per_epoch"] is None  # nothing was trained in this process
    log_dir = next(out.rglob("metrics.json")).parent
    for name in (
        "reliability.png",
        "reliability_calibrated.png",
        "ensemble_size.png",
        "disagreement.png",
        "jsd.png",
        "ensemble_size.csv",
        "diversity.json",
        "temperature_sweep.csv",
        "temperature_sweep.md",
    ):
        assert (log_dir / name).is_file(), name
        assert name in report["files"]
    images = set()
    for events in log_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        images |= set(accumulator.Tags()["images"])
    assert {"test/reliability", "test/reliability_calibrated", "test/ensemble_size"} <= images
    with (log_dir / "temperature_sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["temperature"]) for r in rows] == [0.5, 2.0]
    assert float(rows[1]["nll"]) == pytest.approx(metrics["test/temperature/2/nll"])


def test_ood_auroc_equals_scikit_learn_on_the_same_scores(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, ckpt = trained
    out = tmp_path / "test"
    main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt),
          f"--trainer.default_root_dir={out}", "--plots=false"])  # fmt: skip
    metrics = _report(out)["metrics"]
    # Recompute the maximum softmax probability independently from the checkpoint.
    model, datamodule = _build([str(cfg)], str(ckpt), [f"--data.class_path={DATA_CLASS}"])
    datamodule.setup("test")
    loaders = datamodule.test_dataloader()

    def scores(loader: Any) -> torch.Tensor:
        logits, _ = collect_member_logits(model, loader, lambda b: b)
        return predictive_probs(logits).max(dim=-1).values

    in_scores, ood_scores = scores(loaders[0]), scores(loaders[1])
    labels = [1] * len(in_scores) + [0] * len(ood_scores)
    values = torch.cat([in_scores, ood_scores]).numpy()
    assert metrics["test/ood/noise/msp/auroc"] == pytest.approx(
        roc_auc_score(labels, values), abs=1e-6
    )
    assert metrics["test/ood/noise/msp/auprc"] == pytest.approx(
        average_precision_score(labels, values), abs=1e-6
    )
    # The shift set's accuracy, recomputed
    shift_logits, shift_target = collect_member_logits(model, loaders[2], lambda b: b)
    acc = (predictive_probs(shift_logits).argmax(-1) == shift_target).double().mean()
    assert metrics["test/shift/gaussian/2/acc"] == pytest.approx(float(acc), abs=1e-6)


def test_fit_reports_training_time_and_bf16_metrics_are_float32(tmp_path: Path) -> None:
    cfg = _config(tmp_path, num_members=2)
    main(
        [
            "fit",
            "--config",
            str(cfg),
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=0",
            "--trainer.limit_test_batches=1",
            "--test_after_fit=true",
            "--plots=false",
            "--trainer.precision=bf16-mixed",
        ]
    )
    report = _report(tmp_path / "run")
    compute = report["compute"]
    assert compute["train_epochs_timed"] == 1
    assert compute["train_seconds_per_epoch"] > 0
    # Under bf16-mixed the logits are bf16; every metric must still be computed in float32,
    # so the torchmetrics ECE/NLL equal those of the float32 ensemble-size curve at k = M.
    metrics = report["metrics"]
    assert metrics["test/nll"] == pytest.approx(metrics["test/ensemble_size/2/nll"], abs=1e-5)
    assert metrics["test/ece"] == pytest.approx(metrics["test/ensemble_size/2/ece"], abs=1e-5)


def test_predict_writes_uncertainty_columns(trained: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, ckpt = trained
    path = tmp_path / "pred.parquet"
    main(
        [
            "predict",
            "--config",
            str(cfg),
            "--ckpt_path",
            str(ckpt),
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--prediction_writer.output_path={path}",
            "--prediction_writer.member_predictions=true",
        ]
    )
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(path).to_pydict()
    assert list(table) == [
        "index", "target", "pred", "pred_name", "confidence", "agreement",
        "entropy", "expected_entropy", "mutual_information",
        *(f"prob_{c}" for c in range(10)), "variance", *(f"var_{c}" for c in range(10)),
        "member_pred_0", "member_pred_1", "member_pred_2",
    ]  # fmt: skip
    n = len(table["index"])
    assert table["index"] == list(range(n))
    for i in range(n):
        total = table["entropy"][i]
        assert abs(table["expected_entropy"][i] + table["mutual_information"][i] - total) < 1e-6
        members = {table[f"member_pred_{m}"][i] for m in range(3)}
        if len(members) == 1:  # all members agree on the class, so does the ensemble
            assert table["pred"][i] in members
            assert table["agreement"][i] == 1.0
        assert table["pred_name"][i] == str(table["pred"][i])  # the digits' names


def test_analyze_writes_numbers_and_figures(trained: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, ckpt = trained
    out = tmp_path / "analysis"
    main(
        [
            "analyze",
            "--config",
            str(cfg),
            "--ckpt_path",
            str(ckpt),
            "--output_dir",
            str(out),
            "--max_samples",
            "100",
            "--top_k",
            "4",
            "--plots",
            "true",
            f"--data.class_path={DATA_CLASS}",
        ]
    )
    result = json.loads((out / "analysis.json").read_text())
    assert result["num_samples"] == 100 and result["num_members"] == 3
    assert len(result["tsne"]) == 3
    projections = result["weights"]["projections"]
    # tiny timm ViT: 2 blocks x q, k, v, o
    assert sorted(projections) == sorted(f"{b}.{p}" for b in range(2) for p in "qkvo")
    for values in projections.values():
        assert 0.0 <= values["pretrained_similarity"] <= 1.0 + 1e-9
        assert values["delta_top_singular_value"] > 0  # 8 training steps moved B from 0
        assert 0.0 <= values["member_similarity"] <= 1.0 + 1e-9
        assert len(values["member_similarity_matrix"]) == 3
    assert 0.0 < result["weights"]["diversity_score_v"] <= 2.0
    # 8 steps: the updates are small against W0, so the whole matrices stay correlated
    assert (
        0.0
        < result["weights"]["diversity_score_v_weights"]
        < result["weights"]["diversity_score_v"]
    )
    with (out / "weight_space.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["projection"] for r in rows] == list(projections)
    assert float(rows[0]["member_similarity"]) == pytest.approx(
        projections[rows[0]["projection"]]["member_similarity"]
    )
    for name in (
        "disagreement.png", "jsd.png", "tsne.png", "ensemble_size.png", "weight_similarity.png",
        "pretrained_similarity.png", "delta_singular_values.png", "weight_space.csv",
        "singular_values.png", "member_cosines_v.png", "pretrained_cosines_q.png",
        "delta_cosines_k.png",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    # appendix D: top-k singular values and k x k singular-vector cosine heatmaps (k = 4 here)
    values = projections["1.v"]
    assert len(values["top_singular_values"]) == 3 and len(values["top_singular_values"][0]) == 4
    assert len(values["member_cosines"]) == 4 and len(values["pretrained_cosines"][0]) == 4
    # both Jensen-Shannon statistics (section 4 and per sample)
    assert 0.0 <= result["jsd_bits"] <= 1.0 and 0.0 <= result["jsd_per_sample_bits"] <= 1.0
    assert "trajectory" not in result  # this run recorded none


def test_weight_trajectory_is_recorded_and_drawn(tmp_path: Path) -> None:
    """fit with the WeightTrajectory callback (a CLI option) keeps the members' flattened
    value-projection updates at epoch 0 and every epoch; `lorae analyze` draws their t-SNE."""
    cfg = _config(tmp_path)
    main(
        [
            "fit", "--config", str(cfg), "--seed_everything=0",
            f"--trainer.default_root_dir={tmp_path / 'fit'}", "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=lorae.evaluation.WeightTrajectory",
            "--trainer.callbacks.every_n_epochs=1",
        ]
    )  # fmt: skip
    found = sorted((tmp_path / "fit").rglob("weight_trajectory.pt"))
    assert len(found) == 1, found
    saved = torch.load(found[0], weights_only=True)
    assert saved["epochs"] == [0, 1, 2] and saved["projection"] == "v"
    assert sorted(saved["snapshots"]) == ["0.v", "1.v"]  # tiny ViT: 2 blocks
    snapshots = saved["snapshots"]["1.v"]
    assert snapshots.shape[:2] == (3, 3)  # 3 snapshots x 3 members
    assert snapshots[0].abs().max() == 0  # LoRA's B = 0: the members start at W0
    assert snapshots[2].abs().max() > 0  # ... and moved away from it
    out = tmp_path / "analysis"
    main(
        [
            "analyze", "--config", str(cfg), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
            "--output_dir", str(out), "--max_samples", "50", "--top_k", "4",
            "--trajectory", str(found[0]), "--plots", "true",
            f"--data.class_path={DATA_CLASS}",
        ]
    )  # fmt: skip
    result = json.loads((out / "analysis.json").read_text())
    trajectory = result["trajectory"]
    assert trajectory["epochs"] == [0, 1, 2] and trajectory["num_members"] == 3
    assert len(trajectory["layers"]["1.v"]) == 1 + 3 * 3  # pretrained + snapshots x members
    assert (out / "weight_trajectory.png").is_file()


def test_aggregate_mean_and_std_over_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    accs = []
    for seed in (0, 1):
        cfg = write_config(tmp_path / f"c{seed}.yaml", digits_lora_config(2, seed))
        out = tmp_path / "runs" / f"seed{seed}"
        main(["test", "--config", str(cfg), "--trainer.limit_test_batches=1",
              f"--trainer.default_root_dir={out}", "--plots=false"])  # fmt: skip
        accs.append(_report(out)["metrics"]["test/acc"])
    assert accs[0] != accs[1]  # different seeds, different untrained models
    capsys.readouterr()
    main(["aggregate", str(tmp_path / "runs"), "--metrics", "acc", "nll",
          "compute.parameters.trainable", "--output", str(tmp_path / "table")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "2 runs" in printed
    with (tmp_path / "table.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["group"] == "LoRAEnsemble, num_members=2"
    assert int(rows[0]["n"]) == 2
    assert float(rows[0]["acc/mean"]) == pytest.approx(statistics.fmean(accs))
    assert float(rows[0]["acc/std"]) == pytest.approx(statistics.stdev(accs))
    assert float(rows[0]["compute.parameters.trainable/std"]) == 0.0
    markdown = (tmp_path / "table.md").read_text()
    assert f"{statistics.fmean(accs):.4f} ± {statistics.stdev(accs):.4f}" in markdown
    assert not math.isnan(float(rows[0]["nll/mean"]))


def test_plots_without_matplotlib_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("lorae.evaluation.figures.matplotlib_available", lambda: False)
    cfg = write_config(tmp_path / "c.yaml", digits_lora_config(2))
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(cfg), "--trainer.fast_dev_run=true",
              f"--trainer.default_root_dir={tmp_path}", "--plots=true"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lorae: error:" in err and "lorae[plots]" in err


@pytest.mark.slow
def test_ddp_predict_gathers_one_file_in_sample_order(tmp_path: Path) -> None:
    """Two CPU processes (gloo): rank 0 writes every sample once, in order, and the rows equal
    a single-process run of the same model."""
    cfg = write_config(tmp_path / "c.yaml", digits_lora_config(2))
    paths = {}
    for name, extra in (("single", []), ("ddp", ["--trainer.strategy=ddp_spawn",
                                                  "--trainer.devices=2"])):  # fmt: skip
        paths[name] = tmp_path / f"{name}.csv"
        main(["predict", "--config", str(cfg), *extra,
              f"--trainer.default_root_dir={tmp_path / name}",
              f"--prediction_writer.output_path={paths[name]}"])  # fmt: skip
    rows = {}
    for name, path in paths.items():
        with path.open() as handle:
            rows[name] = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in rows["ddp"]] == list(range(len(rows["single"])))
    for single, ddp in zip(rows["single"], rows["ddp"], strict=True):
        assert single["target"] == ddp["target"] and single["pred"] == ddp["pred"]
        assert float(single["entropy"]) == pytest.approx(float(ddp["entropy"]), abs=1e-5)


def test_tools_accept_a_runs_saved_config(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """A run's saved config.yaml records fit's ckpt_path and weights_only; the tools (built
    without a subcommand) read it anyway, as the docs tell users to pass it."""
    _, ckpt = trained
    saved = sorted((ckpt.parent.parent / "fit").rglob("config.yaml"))
    assert saved, "the fit saved no config.yaml"
    content = yaml.safe_load(saved[0].read_text())
    assert "ckpt_path" in content and "weights_only" in content  # what made the tools fail
    out = tmp_path / "analysis"
    main(
        [
            "analyze",
            "--config",
            str(saved[0]),
            "--ckpt_path",
            str(ckpt),
            "--output_dir",
            str(out),
            "--max_samples",
            "20",
            "--plots",
            "false",
        ]
    )
    assert json.loads((out / "analysis.json").read_text())["num_samples"] == 20
