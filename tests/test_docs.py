"""Lists in the docs that the code could contradict are checked against the code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import lorae.data
from lorae.data.base import ClassificationDataModule
from lorae.evaluation.outputs import prediction_columns

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_usage_names_every_data_module() -> None:
    usage = (DOCS / "usage.md").read_text()
    modules = [
        name
        for name, value in vars(lorae.data).items()
        if inspect.isclass(value)
        and issubclass(value, ClassificationDataModule)
        and value is not ClassificationDataModule
    ]
    assert len(modules) >= 8
    missing = [name for name in modules if f"lorae.data.{name}" not in usage]
    assert not missing, f"docs/usage.md does not name {missing}"


def test_usage_lists_every_prediction_column() -> None:
    usage = (DOCS / "usage.md").read_text()
    section = usage[usage.index("`predictions.csv` after `predict`") :]
    columns = prediction_columns(2, 2, with_file=True, member_predictions=True)
    named = {re.sub(r"_\d+$", "_", c) for c in columns}  # prob_0 / prob_1 -> prob_
    missing = [c for c in sorted(named) if f"`{c}" not in section and f" {c}" not in section]
    assert not missing, f"docs/usage.md's prediction columns lack {missing}"
