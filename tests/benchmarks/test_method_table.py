"""docs/methods.md shows the table benchmarks/method_table.py measures now, and every
registered method."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from lorae.methods import METHODS, SingleNetwork

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "methods.md"


def _method_table() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "method_table", ROOT / "benchmarks" / "method_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_methods_doc_table_is_current() -> None:
    module = _method_table()
    table = module.table()
    assert table.count("\n") == len(module.PAPER) + 1
    assert table in DOC.read_text(), (
        "docs/methods.md is stale: run `python benchmarks/method_table.py`"
    )


@pytest.mark.parametrize("name", METHODS)
def test_methods_doc_describes_every_registered_method(name: str) -> None:
    cls = METHODS[name].__name__
    assert f"** (`{cls}`" in DOC.read_text(), (
        f"docs/methods.md: describe {cls} in a '- **Title** (`{cls}`): ...' item"
    )


def test_method_table_refuses_a_registered_method_without_a_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = _method_table()

    class Unlisted(SingleNetwork):
        pass

    monkeypatch.setitem(module.METHODS, "unlisted", Unlisted)
    with pytest.raises(SystemExit, match="'unlisted' has no CIFAR-100 config"):
        module.table()
