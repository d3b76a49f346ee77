"""``lorae test`` on a tiny model writes the selective-prediction metrics (issue 17, item 4):
the keys in ``metrics.json``, ``risk_coverage.csv`` and ``risk_coverage.png`` in the run folder,
and the figure in the TensorBoard event file."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorae.cli import main
from tests.fixtures.tiny_configs import digits_lora_config, write_config

SELECTIVE = ("aurc", "acc_at_cov90", "acc_at_cov95", "acc_at_cov99")


def test_lorae_test_writes_the_risk_coverage_curve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(sys, "argv", ["lorae"])
    cfg = write_config(tmp_path / "config.yaml", digits_lora_config(num_members=2))
    out = tmp_path / "test"
    main(
        [
            "test",
            "--config",
            str(cfg),
            f"--trainer.default_root_dir={out}",
            "--plots=true",
            "--calibrate=temperature",
            "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
            f"--trainer.logger.init_args.save_dir={out}",
        ]
    )
    found = sorted(out.rglob("metrics.json"))
    assert len(found) == 1, found
    log_dir = found[0].parent
    report = json.loads(found[0].read_text())
    metrics = report["metrics"]
    for prefix in ("", "calibrated/"):
        for name in SELECTIVE:
            for key in (f"test/{prefix}{name}", f"test/{prefix}by_mi/{name}"):
                assert 0.0 <= metrics[key] <= 1.0, key
    for name in ("risk_coverage.csv", "risk_coverage.png"):
        assert (log_dir / name).is_file() and (log_dir / name).stat().st_size > 0, name
        assert name in report["files"]

    with (log_dir / "risk_coverage.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "coverage", "risk", "risk_by_mi", "risk_calibrated", "risk_calibrated_by_mi",
        "risk_oracle",
    ]  # fmt: skip
    n = len(rows)
    assert [float(r["coverage"]) for r in rows] == pytest.approx([k / n for k in range(1, n + 1)])
    risk = [float(r["risk"]) for r in rows]
    # full coverage answers every test sample: the risk is the error rate
    assert risk[-1] == pytest.approx(1 - metrics["test/acc"], abs=1e-6)
    area = sum(risk[k] + risk[k + 1] for k in range(n - 1)) / (2 * (n - 1))
    assert metrics["test/aurc"] == pytest.approx(area, abs=1e-6)
    oracle = [float(r["risk_oracle"]) for r in rows]
    assert all(o <= r + 1e-9 for o, r in zip(oracle, risk, strict=True))

    images: set[str] = set()
    for events in log_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        images |= set(accumulator.Tags()["images"])
    assert "test/risk_coverage" in images
