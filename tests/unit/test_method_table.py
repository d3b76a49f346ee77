"""docs/methods.md shows the table benchmarks/method_table.py measures now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_methods_doc_table_is_current() -> None:
    spec = importlib.util.spec_from_file_location(
        "method_table", ROOT / "benchmarks" / "method_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.table()
    assert table.count("\n") == len(module.PAPER) + 1
    assert table in (ROOT / "docs" / "methods.md").read_text(), (
        "docs/methods.md is stale: run `python benchmarks/method_table.py`"
    )
