"""``lorae calibrate``: a calibrated checkpoint, used the same way by ``lorae predict`` and
:class:`lorae.Predictor`; its errors are one ``lorae: error:`` line."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from lorae import Predictor
from lorae.checkpoints.calibration import CALIBRATION_KEY, calibration_record
from lorae.cli import main
from lorae.cli.calibrate import calibration_from_logits
from lorae.errors import ConfigError
from lorae.evaluation.abstention import minimum_certifiable_risk
from tests.fixtures.tiny_configs import checkpoint_callback, digits_lora_config, write_config


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny digits LoRA-Ensemble (2 members) trained for a few steps: (config, checkpoint)."""
    tmp = tmp_path_factory.mktemp("calibrate_fit")
    config = digits_lora_config()
    config["trainer"].update(
        max_epochs=1, limit_train_batches=8, limit_val_batches=1, default_root_dir=str(tmp)
    )
    config["trainer"]["callbacks"] = [checkpoint_callback(tmp / "ckpt")]
    path = write_config(tmp / "fit.yaml", config)
    main(["fit", "--config", str(path)])
    return path, tmp / "ckpt" / "last.ckpt"


def _digit_pngs(folder: Path, count: int = 12) -> list[Path]:
    folder.mkdir(parents=True)
    images = load_digits().images[-count:]  # 8x8, values 0..16
    paths = []
    for i, image in enumerate(images):
        path = folder / f"digit_{i:02d}.png"
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _predict_csv(ckpt: Path, inputs: Path, out: Path) -> list[dict[str, str]]:
    main(
        [
            "predict",
            "--ckpt_path",
            str(ckpt),
            "--data.predict_path",
            str(inputs),
            f"--prediction_writer.output_path={out}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    with out.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lorae: error: ") and err.count("\n") == 1, err
    return err


def test_calibrate_then_predict_with_cli_and_predictor(
    fitted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, ckpt = fitted
    before = ckpt.read_bytes()
    capsys.readouterr()
    main(["calibrate", "--config", str(config), "--ckpt_path", str(ckpt), "--target_coverage=0.6"])
    out = capsys.readouterr().out
    calibrated = ckpt.with_name("last.calibrated.ckpt")
    assert f"written to {calibrated}" in out and "coverage" in out and "risk" in out
    assert ckpt.read_bytes() == before  # the input is never touched

    original = torch.load(ckpt, weights_only=True)
    saved = torch.load(calibrated, weights_only=True)
    assert set(saved) == set(original) | {CALIBRATION_KEY}
    assert saved["state_dict"].keys() == original["state_dict"].keys()
    for key, value in original["state_dict"].items():
        assert torch.equal(saved["state_dict"][key], value), key
    record = calibration_record(saved)
    assert record is not None and record.threshold is not None
    assert record.target == "coverage" and record.target_value == 0.6 and record.delta is None
    assert record.score == "confidence" and record.temperature > 0
    assert record.validation_coverage is not None and record.validation_coverage >= 0.6
    assert record.num_validation == record.num_temperature > 100  # digits' validation split
    assert "conformal" in record.method and "Vovk" in record.citation

    inputs = tmp_path / "new"
    _digit_pngs(inputs)
    rows = _predict_csv(calibrated, inputs, tmp_path / "p.csv")
    columns = list(rows[0])
    assert columns[columns.index("pred_name") + 1] == "abstain"
    assert [c for c in columns if c.startswith("calibrated_prob_")] == [
        f"calibrated_prob_{c}" for c in range(10)
    ]
    plain = _predict_csv(ckpt, inputs, tmp_path / "plain.csv")
    assert "abstain" not in plain[0] and "calibrated_prob_0" not in plain[0]
    for key in ("pred", "confidence", "prob_3"):  # calibration leaves these unchanged
        assert [r[key] for r in rows] == [r[key] for r in plain]

    # The Predictor gives the same numbers; both equal mean_m softmax(z_m / T) recomputed
    # from the members' own probabilities (log softmax(z) = z + const per member).
    result = Predictor.from_checkpoint(calibrated, batch_size=5).predict(sorted(inputs.iterdir()))
    assert result.calibrated_probs is not None and result.abstain is not None
    csv_calibrated = torch.tensor(
        [[float(r[f"calibrated_prob_{c}"]) for c in range(10)] for r in rows], dtype=torch.float64
    )
    torch.testing.assert_close(result.calibrated_probs, csv_calibrated, rtol=1e-5, atol=1e-7)
    expected = (result.member_probs.log() / record.temperature).softmax(-1).mean(0)
    torch.testing.assert_close(result.calibrated_probs, expected, rtol=1e-9, atol=1e-12)
    confidence = result.calibrated_probs.max(-1).values
    assert result.abstain.tolist() == (confidence < record.threshold).tolist()
    assert result.abstain.tolist() == [r["abstain"] == "1" for r in rows]
    assert Predictor.from_checkpoint(ckpt).predict([inputs / "digit_00.png"]).abstain is None


def test_target_risk_and_its_record(
    fitted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, ckpt = fitted
    output = tmp_path / "risk.ckpt"
    # A run's saved config.yaml also records fit's ckpt_path and weights_only: accepted here.
    saved = yaml.safe_load(config.read_text()) | {"ckpt_path": None, "weights_only": None}
    config = write_config(tmp_path / "config.yaml", saved)
    args = ["calibrate", "--config", str(config), "--ckpt_path", str(ckpt)]
    main([*args, "--target_risk=0.97", "--delta=0.2", "--score=entropy", f"--output={output}"])
    record = calibration_record(torch.load(output, weights_only=True))
    assert record is not None and record.target == "risk"
    assert (record.target_value, record.delta, record.score) == (0.97, 0.2, "entropy")
    assert record.validation_risk is not None and record.validation_risk <= 0.97
    assert "Learn then Test" in record.method and "Angelopoulos" in record.citation
    assert "0.97" in record.guarantee and "0.8" in record.guarantee

    # Replacing it needs --force; the input itself is never replaced.
    err = _error([*args, "--target_risk=0.97", f"--output={output}"], capsys)
    assert "--force" in err
    main([*args, f"--output={output}", "--force"])  # temperature only
    record = calibration_record(torch.load(output, weights_only=True))
    assert record is not None and record.threshold is None and record.target is None
    err = _error([*args, f"--output={ckpt}", "--force"], capsys)
    assert "never replaces its input" in err


def test_a_target_risk_too_low_for_the_validation_split(
    fitted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, ckpt = fitted
    output = tmp_path / "low.ckpt"
    args = ["calibrate", "--config", str(config), "--ckpt_path", str(ckpt), f"--output={output}"]
    err = _error([*args, "--target_risk=0.001"], capsys)
    assert "smallest risk" in err and "larger validation split" in err
    assert not output.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target_risk=0.1", "--target_coverage=0.5"], "not both"),
        (["--delta=0.05"], "--target_risk A"),
        (["--score=entropy"], "--target_coverage C"),
        (["--target_coverage=0.5", "--delta=0.05"], "--delta belongs to --target_risk"),
        (["--target_coverage=0.5", "--data.init_args.val_fraction=0"], "no validation split"),
        (["--target_coverage=1.5"], "strictly between 0 and 1"),
    ],
)
def test_errors_are_one_line(
    fitted: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    config, ckpt = fitted
    output = tmp_path / "x.ckpt"
    args = ["calibrate", "--config", str(config), "--ckpt_path", str(ckpt), f"--output={output}"]
    assert message in _error([*args, *extra], capsys)
    assert not output.exists()


def test_calibration_from_logits_fraction_and_scores() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (400,), generator=generator)
    logits = torch.randn(3, 400, 4, generator=generator)
    logits[:, torch.arange(400), target] += 2.0  # mostly right
    kwargs: dict[str, Any] = {"target_coverage": 0.7, "temperature_fraction": 0.25}
    record = calibration_from_logits(logits, target, **kwargs)
    assert (record.num_temperature, record.num_validation) == (100, 300)
    assert record.validation_coverage is not None and record.validation_coverage >= 0.7
    for score in ("mutual_information", "entropy"):
        record = calibration_from_logits(logits, target, score=score, target_risk=0.3)
        assert record.threshold is not None and record.threshold > 0  # accept below it
        assert record.num_validation == 400
    floor = minimum_certifiable_risk(400, 0.1)
    with pytest.raises(ConfigError, match=f"{floor:.4g}"):
        calibration_from_logits(logits, target, target_risk=floor / 2)
    with pytest.raises(ConfigError, match="temperature_fraction"):
        calibration_from_logits(logits, target, temperature_fraction=1.0)
