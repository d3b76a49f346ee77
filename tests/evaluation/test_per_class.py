"""``lorae test``'s per-class accuracy table, with the data module's class names."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from lorae.cli import main
from lorae.evaluation.callback import per_class_text
from lorae.evaluation.result import ClassAccuracy
from tests.fixtures.tiny_configs import (
    IMAGE_CLASSES,
    IMAGE_PER_CLASS,
    checkpoint_callback,
    image_folder_config,
    write_config,
)


def test_table_counts_and_names() -> None:
    rows = ClassAccuracy.table(torch.tensor([2, 0, 0]), torch.tensor([4, 1, 0]), ["a", "b", "c"])
    assert [(r.name, r.support, r.correct) for r in rows] == [("a", 4, 2), ("b", 1, 0), ("c", 0, 0)]
    assert rows[0].acc == 0.5 and rows[1].acc == 0.0 and math.isnan(rows[2].acc)
    text = per_class_text(rows, limit=2)
    assert "a" in text.splitlines()[1] and "0.5000" in text
    assert "1 more classes" in text


def test_lorae_test_writes_per_class_table_matching_predictions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = image_folder_config(tmp_path / "data")
    config["trainer"].update(
        max_epochs=1,
        callbacks=[checkpoint_callback(tmp_path / "ckpt")],
        default_root_dir=str(tmp_path / "fit"),
    )
    path = write_config(tmp_path / "fit.yaml", config)
    main(["fit", "--config", str(path)])
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    out = tmp_path / "test"
    capsys.readouterr()
    main(["test", "--config", str(path), "--ckpt_path", ckpt, f"--trainer.default_root_dir={out}"])
    printed = capsys.readouterr().out
    with (out / "per_class.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["name"] for r in table] == list(IMAGE_CLASSES)
    assert all(int(r["support"]) == IMAGE_PER_CLASS for r in table)
    for name in IMAGE_CLASSES:
        assert name in printed
    assert (out / "per_class.md").is_file()

    # The same counts from the prediction file of the same checkpoint.
    csv_path = tmp_path / "p.csv"
    main(
        [
            "predict",
            "--config",
            str(path),
            "--ckpt_path",
            ckpt,
            f"--prediction_writer.output_path={csv_path}",
        ]
    )
    with csv_path.open(newline="") as handle:
        predictions = list(csv.DictReader(handle))
    for row in table:
        mine = [p for p in predictions if p["target"] == row["index"]]
        assert int(row["correct"]) == sum(p["pred"] == p["target"] for p in mine)
        assert all(p["pred_name"] == IMAGE_CLASSES[int(p["pred"])] for p in mine)
